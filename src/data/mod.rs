//! Datasets (ImageFolder), class lists, image decode/resize/augment, CSV manifests.
