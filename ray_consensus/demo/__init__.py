"""The offline demo: a small labelled image set with masks built from scikit-image's photos, and a
committee of small timm models trained on it (cached).
"""
