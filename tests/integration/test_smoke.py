from tests.support.xks_client import XksClient, decrypt_fields


def test_round_trip(client: XksClient) -> None:
    enc = client.encrypt("foo", plaintext="SGVsbG8=")
    assert enc.status == 200, enc.body
    dec = client.decrypt("foo", **decrypt_fields(enc.json))
    assert dec.status == 200, dec.body
    assert dec.json == {"plaintext": "SGVsbG8="}
