"""The parts of ``acqhost-load`` built so far: the recorder and its reports (``report``), the
``--fail-if`` thresholds (``thresholds``), the ``--plot`` picture (``plot``) and the live
progress line (``progress``). The ``run`` and ``replay`` commands are not built."""
