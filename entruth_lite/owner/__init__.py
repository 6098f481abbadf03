"""The dataset owner's side: protect a release (``protect``, ``selection``, ``triggers``, ``keys``: the key and the
release's commitment to it), probe a suspect (``probe``), find the template in its images (``detect``, with the
owner's plain images as negatives: ``calibration``), turn that into p-values (``verify``), the audit and its record
(``audit``, ``record``, ``replay``) and the evidence report (``report``). Imports only ``core``."""
