"""cai: constitutions in, critique-revision SFT data and AI-feedback preferences out."""
