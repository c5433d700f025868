"""ReCLIP: source-free domain adaptation of CLIP models (pipeline on top of reclip_ext)."""
