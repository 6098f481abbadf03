"""Measuring the method: attacks against the audit (``robustness``), what a fine-tune gained from the data
(``utility``), other protections side by side (``baselines``) and what protection costs in image quality
(``quality``). May import both sides."""
