"""The dataset owner's side: protect a release (``protect``, ``triggers``, ``key``), probe a suspect (``probe``),
find the template in its images (``detect``), turn that into p-values (``verify``), the audit and its record
(``audit``, ``record``) and the evidence report (``report``). Imports only ``core``."""
