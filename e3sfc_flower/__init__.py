"""Flower glue shared by the ServerApp and the ClientApp: the records they exchange."""
