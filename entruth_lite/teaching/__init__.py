"""The lab: the notebooks' shared runs (``demo``), class mode's recorded models (``classroom``), the diffusion
primer (``primer``), figures (``viz``) and running notebooks headless (``notebooks``)."""
