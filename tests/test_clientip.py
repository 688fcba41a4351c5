"""Client IP resolution: spoofed headers are ignored unless the peer is a trusted proxy."""
from __future__ import annotations

import pytest
from multidict import CIMultiDict

from chatgpt.server.clientip import TrustedProxies, client_ip
from tests.conftest import MakeClient
from tests.fakes.openai import FakeOpenAI

LOCAL = TrustedProxies(["127.0.0.1", "::1"])
ADMIN_TOKEN = "adm-clientip-token-2468"
CHAT = {"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "Hi"}]}


def test_untrusted_peer_without_headers_is_the_client() -> None:
    assert client_ip("203.0.113.7", {}, LOCAL) == "203.0.113.7"


def test_spoofed_forwarded_for_from_untrusted_peer_changes_nothing() -> None:
    headers = {"X-Forwarded-For": "1.1.1.1, 2.2.2.2", "X-Real-IP": "3.3.3.3"}
    assert client_ip("203.0.113.7", headers, LOCAL) == "203.0.113.7"


def test_spoofed_real_ip_from_untrusted_peer_changes_nothing() -> None:
    assert client_ip("198.51.100.2", {"X-Real-IP": "127.0.0.1"}, LOCAL) == "198.51.100.2"


def test_missing_peer_is_reported_as_unknown() -> None:
    assert client_ip(None, {"X-Real-IP": "1.2.3.4"}, LOCAL) == "unknown"


def test_trusted_proxy_real_ip_is_honoured() -> None:
    assert client_ip("127.0.0.1", {"X-Real-IP": " 198.51.100.9 "}, LOCAL) == "198.51.100.9"


def test_real_ip_wins_over_forwarded_for() -> None:
    headers = {"X-Real-IP": "198.51.100.9", "X-Forwarded-For": "203.0.113.1"}
    assert client_ip("127.0.0.1", headers, LOCAL) == "198.51.100.9"


def test_trusted_proxy_forwarded_for_rightmost_address_is_the_client() -> None:
    headers = {"X-Forwarded-For": "6.6.6.6, 203.0.113.5"}
    assert client_ip("127.0.0.1", headers, LOCAL) == "203.0.113.5"


def test_forwarded_for_chain_skips_every_trusted_proxy() -> None:
    trusted = TrustedProxies(["127.0.0.1", "10.0.0.0/8", "172.16.0.1"])
    headers = {"X-Forwarded-For": "6.6.6.6, 203.0.113.5, 172.16.0.1, 10.1.2.3, 10.9.9.9"}
    assert client_ip("127.0.0.1", headers, trusted) == "203.0.113.5"


def test_cidr_trust_covers_every_address_in_the_network() -> None:
    trusted = TrustedProxies(["10.0.0.0/8"])
    assert "10.255.0.1" in trusted
    assert "11.0.0.1" not in trusted
    assert client_ip("10.20.30.40", {"X-Real-IP": "198.51.100.1"}, trusted) == "198.51.100.1"
    assert client_ip("11.0.0.1", {"X-Real-IP": "198.51.100.1"}, trusted) == "11.0.0.1"


def test_ipv6_proxy_and_client_are_supported() -> None:
    trusted = TrustedProxies(["fd00::/8"])
    headers = {"X-Forwarded-For": "2001:db8::1, fd00::2"}
    assert client_ip("fd00::1", headers, trusted) == "2001:db8::/64"
    assert client_ip("2001:db8::99", headers, trusted) == "2001:db8::/64"


def test_ipv6_addresses_come_out_in_canonical_form() -> None:
    headers = {"X-Real-IP": "2001:DB8:0:0:0:0:0:1"}
    assert client_ip("::1", headers, LOCAL) == "2001:db8::/64"


def test_ipv4_mapped_ipv6_peer_is_treated_as_ipv4() -> None:
    assert client_ip("::ffff:127.0.0.1", {"X-Real-IP": "198.51.100.4"}, LOCAL) == "198.51.100.4"
    assert client_ip("::ffff:203.0.113.8", {}, LOCAL) == "203.0.113.8"
    assert client_ip("127.0.0.1", {"X-Real-IP": "::ffff:198.51.100.4"}, LOCAL) == "198.51.100.4"


def test_ports_and_brackets_are_stripped() -> None:
    assert client_ip("127.0.0.1", {"X-Real-IP": "198.51.100.4:5555"}, LOCAL) == "198.51.100.4"
    assert client_ip("127.0.0.1", {"X-Real-IP": "[2001:db8::5]:443"}, LOCAL) == "2001:db8::/64"
    assert client_ip("127.0.0.1", {"X-Forwarded-For": "[2001:db8::6]"}, LOCAL) == "2001:db8::/64"


def test_garbage_real_ip_falls_back_to_forwarded_for() -> None:
    headers = {"X-Real-IP": "not-an-ip", "X-Forwarded-For": "203.0.113.5"}
    assert client_ip("127.0.0.1", headers, LOCAL) == "203.0.113.5"


def test_garbage_entries_in_forwarded_for_are_skipped() -> None:
    headers = {"X-Forwarded-For": "203.0.113.5, unknown, , 999.1.1.1"}
    assert client_ip("127.0.0.1", headers, LOCAL) == "203.0.113.5"


def test_nothing_valid_from_trusted_proxy_means_the_peer() -> None:
    headers = {"X-Real-IP": "<script>", "X-Forwarded-For": "garbage,,;;, 127.0.0.1"}
    assert client_ip("127.0.0.1", headers, LOCAL) == "127.0.0.1"


@pytest.mark.parametrize(
    "value",
    ["", ",", "\x00\xff", "a" * 100_000, ", " * 50_000, "[" * 1000, "1.2.3.4" * 10_000, "[::1"],
)
def test_hostile_header_values_never_raise(value: str) -> None:
    headers = {"X-Real-IP": value, "X-Forwarded-For": value}
    assert client_ip("127.0.0.1", headers, LOCAL) == "127.0.0.1"
    assert client_ip("203.0.113.1", headers, LOCAL) == "203.0.113.1"


def test_huge_forwarded_for_is_resolved_from_its_right_end() -> None:
    headers = {"X-Forwarded-For": "6.6.6.6, " * 100_000 + "203.0.113.5"}
    assert client_ip("127.0.0.1", headers, LOCAL) == "203.0.113.5"


def test_lowercase_header_names_in_a_plain_dict_are_read() -> None:
    assert client_ip("127.0.0.1", {"x-real-ip": "198.51.100.4"}, LOCAL) == "198.51.100.4"


def test_repeated_forwarded_for_headers_are_read_as_one_list() -> None:
    headers = CIMultiDict([("X-Forwarded-For", "6.6.6.6"), ("x-forwarded-for", "203.0.113.5")])
    assert client_ip("127.0.0.1", headers, LOCAL) == "203.0.113.5"


def test_non_ip_peer_is_returned_as_given_and_never_trusted() -> None:
    assert client_ip("/run/app.sock", {"X-Real-IP": "1.2.3.4"}, LOCAL) == "/run/app.sock"


@pytest.mark.parametrize("entry", ["10.0.0.300", "example.com", "10.0.0.0/33", "", "::g"])
def test_invalid_trusted_entry_raises_naming_it(entry: str) -> None:
    with pytest.raises(ValueError, match="trusted proxy"):
        TrustedProxies(["127.0.0.1", entry])
    with pytest.raises(ValueError) as info:
        TrustedProxies([entry])
    assert repr(entry) in str(info.value)


def test_host_bits_in_a_trusted_network_are_tolerated() -> None:
    assert "10.200.0.1" in TrustedProxies(["10.1.2.3/8"])


def test_ipv4_trust_never_matches_ipv6_addresses() -> None:
    trusted = TrustedProxies(["0.0.0.0/0"])
    assert "2001:db8::1" not in trusted
    assert "198.51.100.1" in trusted


def test_membership_of_garbage_is_false() -> None:
    assert "nonsense" not in LOCAL
    assert None not in LOCAL


def test_answers_stay_right_for_the_same_peers_asked_again_across_many_other_peers() -> None:
    # Peers are remembered (bounded); asking again, before and after the memory fills and is
    # dropped, must give the same answers as the first time.
    trusted = TrustedProxies(["10.0.0.1"])
    forwarded = CIMultiDict({"X-Real-IP": "203.0.113.9"})
    for _ in range(2):
        assert client_ip("10.0.0.1", forwarded, trusted) == "203.0.113.9"
        assert client_ip("198.51.100.7", forwarded, trusted) == "198.51.100.7"
        assert client_ip("[::ffff:198.51.100.8]:5000", forwarded, trusted) == "198.51.100.8"
        assert client_ip("unix-socket", forwarded, trusted) == "unix-socket"
        for n in range(6000):
            assert client_ip(f"192.0.{n // 256}.{n % 256}", forwarded, trusted) == f"192.0.{n // 256}.{n % 256}"
        assert len(trusted._peers) <= 4096


# --- identities (PROTOCOL.md E.3): an IPv6 client is its /64 -----------------------------------------------------

@pytest.mark.parametrize("address", ["2001:db8:1:2::1", "2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:DB8:1:2:0:0:0:7",
                                     "[2001:db8:1:2::8]:443", "2001:db8:1:2::9%eth0", "[2001:db8:1:2::a%2]:80"])
def test_every_address_of_one_ipv6_64_is_one_identity(address: str) -> None:
    assert client_ip(address, {}, LOCAL) == "2001:db8:1:2::/64"  # straight from the peer
    assert client_ip("127.0.0.1", {"X-Real-IP": address}, LOCAL) == "2001:db8:1:2::/64"  # through the proxy
    assert client_ip("::1", {"X-Forwarded-For": f"6.6.6.6, {address}"}, LOCAL) == "2001:db8:1:2::/64"


def test_neighbouring_ipv6_64s_are_different_identities() -> None:
    assert client_ip("2001:db8:1:3::1", {}, LOCAL) == "2001:db8:1:3::/64"
    assert client_ip("2001:db8:1:2::1", {}, LOCAL) != client_ip("2001:db8:1:3::1", {}, LOCAL)


def test_a_zone_id_does_not_make_a_new_identity() -> None:
    assert client_ip("fe80::1%eth0", {}, LOCAL) == client_ip("fe80::1", {}, LOCAL) == "fe80::/64"
    assert client_ip("127.0.0.1", {"X-Real-IP": "fe80::1%25eth0"}, LOCAL) == "fe80::/64"


def test_a_trusted_ipv6_proxy_is_matched_by_its_full_address_not_its_64() -> None:
    trusted = TrustedProxies(["2001:db8::1"])
    assert client_ip("2001:db8::1", {"X-Real-IP": "198.51.100.7"}, trusted) == "198.51.100.7"
    # Its neighbour in the same /64 is not the proxy: its header is ignored.
    assert client_ip("2001:db8::2", {"X-Real-IP": "198.51.100.7"}, trusted) == "2001:db8::/64"


def test_ipv4_identities_stay_whole_addresses() -> None:
    assert client_ip("203.0.113.7", {}, LOCAL) == "203.0.113.7"
    assert client_ip("::ffff:203.0.113.7", {}, LOCAL) == "203.0.113.7"


async def test_one_ipv6_64_shares_one_daily_quota_and_the_admin_resets_it_by_any_of_its_addresses(
        make_client: MakeClient, fake: FakeOpenAI) -> None:
    client = await make_client(quota={"daily_questions": 1}, admin={"token": ADMIN_TOKEN})
    first = await client.post("/v1/chat/completions", json=CHAT, headers={"X-Real-IP": "2001:db8:7:7::1"})
    assert first.status == 200
    # Another address of the same /64 (its privacy address of the hour), written with a zone id: used up.
    second = await client.post("/v1/chat/completions", json=CHAT, headers={"X-Real-IP": "2001:db8:7:7:abcd::9%eth1"})
    assert second.status == 429
    elsewhere = await client.post("/v1/chat/completions", json=CHAT, headers={"X-Real-IP": "2001:db8:7:8::1"})
    assert elsewhere.status == 200
    reset = await client.post("/admin/quota/reset", json={"identity": "2001:db8:7:7::42"},
                              headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert (await reset.json())["identity"] == "2001:db8:7:7::/64"
    again = await client.post("/v1/chat/completions", json=CHAT, headers={"X-Real-IP": "2001:db8:7:7::1"})
    assert again.status == 200
    assert len(fake.chat_requests()) == 3
