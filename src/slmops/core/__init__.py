"""Pure decisions over values: manifests, requirements, variant choice. No I/O, no clock unless passed in."""
