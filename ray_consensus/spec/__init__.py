"""The run spec: typed sections with defaults, bounds and help (`fields`), the spec itself and its
checks (`config`), and each explainer's parameters (`explainer_params`). Pure Python: no Ray, no torch.
"""
