"""OVSegmentor: open-vocabulary segmentation learned from captions (ViT + grouping block + BERT text encoder)."""
