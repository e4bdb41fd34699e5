"""What crosses between the two owners: the bundle, the adapter file and the fingerprint that ties them."""
