"""Heads for images: classification over the pooled encoder output, UperNet semantic segmentation
and its mIoU metrics.

Each head module is its own ``d2v`` entry point; nothing here is imported by core."""
