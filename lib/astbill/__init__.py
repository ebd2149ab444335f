"""AstBill: real-time prepaid billing for Asterisk."""
