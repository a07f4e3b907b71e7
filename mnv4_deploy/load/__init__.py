"""Stage 1, load: the model (timm variant, pretrained / random / checkpoint weights, from the hub or its cache),
its preprocessing, and the images (calibration sets, held-back and val folders)."""
