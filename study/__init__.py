"""The debiasing study: does DropClass debias a segmentation network? (see README.md here)."""
