"""Pulls from a PACS (`diana collect`): find studies by accession, patient or date range (C-FIND,
Study Root), have the PACS send them to diana-star's own receiver (C-MOVE) so they take the C-STORE
path, throttled, with each job's state on the ``collect.jobs`` topic so a restart goes on where it
stopped. docs/COLLECT.md."""
