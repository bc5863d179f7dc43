"""Factor sets (layer 2): the `FactorSet` format, base-weight fingerprints, the local cache, in-memory and streamed
computation, target discovery, fit statistics and factor-set cards."""
