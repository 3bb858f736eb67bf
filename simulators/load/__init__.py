"""The parts of ``acqhost-load`` built so far: the recorder and its reports (``report``) and the
``--fail-if`` thresholds (``thresholds``). The ``run`` and ``replay`` commands are not built."""
