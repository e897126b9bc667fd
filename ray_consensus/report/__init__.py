"""What a reader sees: the report's data gathered from the run root (`collect`), rendered as one
self-contained HTML page (`render`; its charts and gallery: `figures`; the HTML pieces both use:
`markup`), and pseudo segmentation masks from the consensus (`pseudo_masks`).
"""
