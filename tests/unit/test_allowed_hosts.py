"""Unit: ``allowed_hosts`` of the receiver and of query/retrieve: addresses and networks, names refused at load."""

from __future__ import annotations

import pytest

from diana.config import ConfigError, load_config, parse_allowed_hosts


def test_addresses_and_networks_admit_their_peers_and_no_others():
    hosts = parse_allowed_hosts(("10.1.2.3", "10.1.3.0/24", "fd00::/64", "192.168.1.7/16"))
    admitted = ["10.1.2.3", "10.1.3.0", "10.1.3.255", "fd00::5", "192.168.200.1", "::ffff:10.1.3.9"]
    refused = ["10.1.2.4", "10.1.4.1", "fd01::1", "127.0.0.1", "not-an-address", ""]
    assert all(hosts.admits(peer) for peer in admitted)
    assert not any(hosts.admits(peer) for peer in refused)
    # An IPv4-mapped entry stands for its IPv4 address or range, as a dual-stack socket reports peers either way.
    mapped = parse_allowed_hosts(("::ffff:10.9.0.0/112",))
    assert mapped.admits("10.9.1.2") and mapped.admits("::ffff:10.9.1.2") and not mapped.admits("10.10.0.1")
    assert not parse_allowed_hosts(())  # empty: no list (every host), said by its falsiness


@pytest.mark.parametrize("section", ["receiver", "query_retrieve"])
def test_a_name_in_either_list_is_refused_when_the_configuration_is_loaded(tmp_path, section):
    path = tmp_path / "diana.toml"
    path.write_text(f'[{section}]\nallowed_hosts = ["10.1.2.3", "pacs.example.org"]\n')
    with pytest.raises(ConfigError, match=rf"\[{section}\] allowed_hosts: 'pacs.example.org' is neither an IP"):
        load_config(path, environ={})
    env = {f"DIANA_{section.upper()}_ALLOWED_HOSTS": "10.1.2.0/24, fd00::5"}
    assert getattr(load_config(environ=env), section).allowed_hosts == ("10.1.2.0/24", "fd00::5")


def test_the_receiver_admits_a_peer_by_its_network_and_refuses_others():
    from diana.producers.scp import _allowed_hosts

    hosts = _allowed_hosts(("127.0.0.0/31", "::1"))
    assert hosts.admits("127.0.0.1") and hosts.admits("::1") and not hosts.admits("127.0.0.2")


def test_a_network_with_a_zone_id_is_refused_rather_than_read_as_one_address():
    with pytest.raises(ConfigError, match="zone id"):
        parse_allowed_hosts(("fe80::%eth0/64",), "receiver")
    assert parse_allowed_hosts(("fe80::1%eth0",)).admits("fe80::1")  # an address with its zone: the address
