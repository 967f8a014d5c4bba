# -*- coding: utf-8 -*-
# SPDX-License-Identifier: GPL-3.0-or-later
import pytest

from ansible_collections.gpuvirt.kvm.plugins.module_utils._units import parse_size_mb


@pytest.mark.parametrize("value, mib", [
    (64, 64), ("64", 64), ("64GiB", 65536), ("64G", 65536), ("512M", 512), ("512 MiB", 512),
    ("1.5TiB", 1572864), ("1073741824B", 1024), ("2097152KiB", 2048),
])
def test_sizes(value, mib):
    assert parse_size_mb(value, "memory") == mib


# Decimal units rarely land on whole MiB: refusing beats rounding a VM's memory silently.
@pytest.mark.parametrize("value", ["x", "0", 0, -5, True, "12 parsecs", "1.5", "1GB", "2048MB"])
def test_bad_sizes_name_the_option(value):
    with pytest.raises(ValueError) as err:
        parse_size_mb(value, "memory")
    assert str(err.value).startswith("memory:")
