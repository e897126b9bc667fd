"""Committee members: a timm name plus a source of weights (`committee`), pretrained weights found
before Ray starts (`pretrained`) and timm's list of names (`names`).
"""
