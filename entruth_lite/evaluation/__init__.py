"""Measuring the method: attacks against the audit (``robustness``), other protections side by side
(``baselines``) and what protection costs in image quality (``quality``). May import both sides."""
