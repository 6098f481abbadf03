"""The infringer's side: fine-tuning on a release (``config``, ``checkpoints``, ``train``) and what someone who
suspects protection does to the data and the training (``attacks``). Imports only ``core``: the infringer has no
key."""
