"""Model families behind one adapter protocol, and the registry that builds them."""
