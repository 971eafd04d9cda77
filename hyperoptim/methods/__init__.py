"""The hypergradient methods (HD, MARTHE, IFT, FDS), each written once over an update rule."""
