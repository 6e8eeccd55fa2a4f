"""Query/Retrieve SCP: C-FIND answered from the OpenSearch index, C-MOVE and C-GET from the archive."""
