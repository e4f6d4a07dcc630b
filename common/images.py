"""Image facts several stages agree on."""

# File name endings read as images (ImageFolder trees, webdataset members), lower case.
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

# ImageNet channel statistics on the [0, 1] scale: what the LeJEPA presets (MultiCropSpec's default) and the
# evaluation's input transform normalise with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
