"""What both sides share: datasets and image I/O (``data``, ``files``: folders written whole, ``emoji``), models
and their loading (``models``, ``zoo``, ``sd_architecture``), the diffusion objective (``diffusion``), templates
(``templates``, their random families and decoys ``families``, on disk and by name ``template_io``) and
augmentation. Imports nothing of the other folders."""
