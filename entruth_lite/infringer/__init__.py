"""The infringer's side: fine-tuning on a release (``presets``: ``TrainConfig`` and the presets; ``train``, the loop;
``checkpoints``) and what someone who suspects protection does to the data and the training (``attacks``). Imports
only ``core``: the infringer has no key."""
