# -*- coding: utf-8 -*-
# SPDX-License-Identifier: GPL-3.0-or-later
"""kvm_image's backend (_image_task): which domains use an image, and the host lock."""


import pytest
from image_helpers import qcow2, run, snapshot

from ansible_collections.gpuvirt.kvm.plugins.module_utils._holdings import disk_chains
from ansible_collections.gpuvirt.kvm.plugins.module_utils._image_task import ImageTask
from ansible_collections.gpuvirt.kvm.plugins.module_utils._libvirt import (
    LibvirtGateway,
    has_libvirt,
)
from ansible_collections.gpuvirt.kvm.plugins.module_utils._qemu_img import (
    ImagesError,
    create_overlay,
    disk_usage,
)

# ----------------------------------------------------------------------------- libvirt usage


@pytest.mark.libvirt
@pytest.mark.skipif(not has_libvirt(), reason="libvirt-python is not installed")
def test_usage_from_a_real_libvirt_domain(store, src, tmp_path):
    run(store, name="os", version="1", src=qcow2(src / "1.qcow2"))
    overlay = create_overlay(str(store / "os"), tmp_path / "vm.qcow2")
    xml = ("<domain type='test'><name>gpuvirt-unit-usage</name><memory>65536</memory>"
           "<os><type>hvm</type></os><devices><disk type='file' device='disk'>"
           "<source file='%s'/><target dev='vda'/></disk></devices></domain>" % overlay.path)
    with LibvirtGateway("test:///default") as gateway:
        dom = gateway.conn.defineXML(xml)
        try:
            def reader():
                return disk_chains(gateway.list_domains(live=True), gateway.volume_path)

            chains = reader()
            assert chains["gpuvirt-unit-usage"] == (overlay.path,)
            usage, warnings = disk_usage(chains)
            assert usage[str(store / "os-1.qcow2")] == ["gpuvirt-unit-usage"]
            assert any("/guest/diskimage1" in w for w in warnings)  # the driver's own domain
            with pytest.raises(ImagesError, match="used by domain gpuvirt-unit-usage"):
                ImageTask({"name": "os", "state": "absent", "store": str(store)},
                          usage_reader=reader).run()
        finally:
            dom.undefine()
    assert (store / "os-1.qcow2").exists()


def test_changes_wait_for_the_host_lock_but_reruns_do_not(store, src, tmp_path):
    from ansible_collections.gpuvirt.kvm.plugins.module_utils._lock import HostLock, HostLockError

    image = qcow2(src / "a.qcow2")
    lock_path = str(tmp_path / "alloc.lock")
    run(store, name="x", version="1", src=image)
    before = snapshot(str(store))
    with HostLock(lock_path, timeout=1, owner="kvm_vm other-run"):
        rerun = ImageTask({"name": "x", "version": "1", "src": image, "store": str(store)},
                          lock=HostLock(lock_path, timeout=0)).run()
        assert not rerun["changed"]
        with pytest.raises(HostLockError, match="kvm_vm other-run"):
            ImageTask({"name": "x", "version": "2", "src": image, "store": str(store)},
                      lock=HostLock(lock_path, timeout=0)).run()
    assert snapshot(str(store)) == before  # the staged copy was removed
