"""The labelled images: the manifest of a folder or table (`manifest`), decoding images and masks onto
the shared crop (`decode`), and the superpixels LIME's committee shares (`superpixels`).
"""
