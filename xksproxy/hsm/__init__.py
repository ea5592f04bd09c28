"""The HSM layer: a Protocol the service uses, and its PKCS#11 implementation."""
