"""prefixserve-client: PrefixServeClient, AsyncPrefixServeClient and the prefixctl CLI."""
