"""The real-component helpers live in blktx.testing (shipped for plugin authors)."""

from blktx.testing.fixtures import (  # noqa: F401
    VM,
    chain,
    make_image,
    needs_qemu_img,
    needs_qemu_system,
    run,
    same_data,
    snapshots,
    subvolumes,
    world,
)
