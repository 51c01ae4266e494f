"""Features -> temporal detections: the ActionFormer family, training, inference, ActivityNet-style mAP."""
