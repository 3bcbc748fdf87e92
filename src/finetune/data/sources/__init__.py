"""Where images come from: scikit-learn's digits, an image folder, torchvision datasets, fake data; the shared
stratified hold-out (`hold_out`) and the image-files datamodule they build on (`files`)."""
