"""`diana route`: forward what arrives to other systems by rules (DICOM C-STORE or DICOMweb STOW-RS).

``rules.py`` reads and checks the rules file and matches events; ``senders.py`` sends archived
objects to one destination; ``worker.py`` is one destination's consumer loop (its own consumer
group, retries, dead letters, lag); ``service.py`` runs one worker per destination. docs/ROUTING.md.
"""
