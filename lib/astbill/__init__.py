"""AstBill: real-time prepaid billing for Asterisk."""
__version__ = "0.2.0"
