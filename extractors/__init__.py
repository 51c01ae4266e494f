"""Video -> features: decoding, clip sampling, preprocessing, backbones, checkpoint loading."""
