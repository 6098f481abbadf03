"""What both sides share: datasets and image I/O (``data``, ``files``, ``emoji``), models and their loading
(``models``, ``zoo``, ``sd_architecture``), the diffusion objective (``diffusion``), templates and augmentation.
Imports nothing of the other folders."""
