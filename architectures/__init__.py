"""hpctrain's reference architectures, one package each (see the architecture API)."""
