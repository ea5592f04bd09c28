"""xksproxy: an AWS KMS external key store (XKS) proxy over PKCS#11 HSMs."""

__version__ = "0.1.0"
