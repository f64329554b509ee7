SUMMARY = "LamaDist RAUC update bundle (verity format; only changed blocks are fetched)"
DESCRIPTION = "Updates the inactive slot: the EROFS root (to /dev/mapper/rootfs_<x>), its dm-verity \
hash tree (verity_<x>) and its UKI on the ESP. One bundle serves every host of the inventory \
(LAMADIST_HOSTS): the efi image holds the template UKIs, hosts/<machine-id>/ the patch to each \
host's own signed UKI. Signed with the RAUC code-signing key of the key directory; \
`lamadist bundle encrypt` turns it into a crypt bundle per device."
LICENSE = "MIT"

inherit bundle

SRC_URI += "file://lamadist-bundle-hook"

RAUC_BUNDLE_COMPATIBLE = "${RAUC_COMPATIBLE}"
RAUC_BUNDLE_VERSION = "${DISTRO_VERSION}"
RAUC_BUNDLE_DESCRIPTION = "${DISTRO_NAME} ${DISTRO_VERSION} for ${MACHINE}"
RAUC_BUNDLE_FORMAT = "verity"
# A device streams the bundle and fetches whole squashfs blocks: 16 KiB ones (the toolkit's
# RELEASE_SQUASHFS_BLOCK) keep an update's download near the blocks that changed. Stored verbatim,
# each image on a 4 KiB boundary (lamadist_bundle_align), a block is exactly the 4 KiB sectors the
# device reads it in; the images come compressed already (EROFS lz4hc, compressed kernels).
LAMADIST_BUNDLE_SORT = "${WORKDIR}/lamadist-bundle.sort"
BUNDLE_ARGS += ' --mksquashfs-args="-b 16384 -noD -no-fragments -no-duplicates -no-sparse -sort ${LAMADIST_BUNDLE_SORT}" '

RAUC_BUNDLE_HOOKS[file] = "lamadist-bundle-hook"
# Refuses the bundle on a host it does not carry, or whose identity it would drop.
RAUC_BUNDLE_HOOKS[hooks] = "install-check"

# verity first: RAUC installs in manifest order, and the rootfs install hook reads the new tree
# from the target's verity slot to fetch only the root image blocks whose hash changed (the tree
# is the block index, so the root image needs no adaptive index of its own).
RAUC_BUNDLE_SLOTS = "verity rootfs efi"

RAUC_SLOT_verity = "lama-image-base"
RAUC_SLOT_verity[fstype] = "verity"
RAUC_SLOT_verity[adaptive] = "${LAMADIST_RAUC_ADAPTIVE}"

RAUC_SLOT_rootfs = "lama-image-base"
RAUC_SLOT_rootfs[fstype] = "${LAMADIST_EROFS_TYPE}"
RAUC_SLOT_rootfs[hooks] = "install"

# The template UKIs; the hook rebuilds the host's signed UKI of the target slot from its patch.
RAUC_SLOT_efi = "lama-image-base"
RAUC_SLOT_efi[fstype] = "ukis.tar"
RAUC_SLOT_efi[hooks] = "install"

LAMADIST_EROFS_TYPE ?= "erofs-lz4hc"
LAMADIST_RAUC_ADAPTIVE ?= "block-hash-index"

# Signed with the RAUC code-signing key of the key directory (`lamadist keys init`).
RAUC_KEY_FILE = "${LAMADIST_SIGNING_DIR}/rauc-signing.key"
RAUC_CERT_FILE = "${LAMADIST_SIGNING_DIR}/rauc-signing.crt"
RAUC_KEYRING_FILE = "${LAMADIST_SIGNING_DIR}/rauc-ca.crt"
LAMADIST_SIGNING_DIR ??= ""

inherit lamadist-signing
do_bundle[prefuncs] += "lamadist_require_signing_dir"

# The fleet's host inventory (hosts.yaml of `lamadist host add`), forwarded from the environment.
LAMADIST_HOSTS ??= ""
LAMADIST_BUNDLE_EFI_IMAGE = "${DEPLOY_DIR_IMAGE}/${RAUC_SLOT_efi}${IMAGE_MACHINE_SUFFIX}${IMAGE_NAME_SUFFIX}.ukis.tar"

# hosts/ and uki-blocks/ are written to S, where meta-rauc looks for extra files after DEPLOY_DIR_IMAGE.
RAUC_BUNDLE_EXTRA_FILES += "hosts uki-blocks"
DEPENDS += "sbsigntool-native"

python do_lamadist_hosts () {
    import os
    import lamadist.release
    hosts = d.getVar('LAMADIST_HOSTS')
    if not hosts:
        bb.fatal("LAMADIST_HOSTS is not set: export the fleet's host inventory (hosts.yaml, `lamadist host add`); "
                 "a release bundle without hosts would be refused by every device")
    for extra in ('hosts', 'uki-blocks'):
        shadow = os.path.join(d.getVar('DEPLOY_DIR_IMAGE'), extra)
        if os.path.exists(shadow):
            bb.fatal("%s exists and meta-rauc would put it into the bundle instead of this release's %s/; remove it" % (shadow, extra))
    keydir = d.getVar('LAMADIST_SIGNING_DIR')
    try:
        report = lamadist.release.write_release(
            d.getVar('LAMADIST_BUNDLE_EFI_IMAGE'), hosts,
            os.path.join(keydir, 'db.key'), os.path.join(keydir, 'db.crt'), d.getVar('S'),
            sbsign=os.path.join(d.getVar('STAGING_BINDIR_NATIVE'), 'sbsign'))
    except lamadist.release.ReleaseError as err:
        bb.fatal(str(err))
    for name, machine_id, size in report:
        bb.note("host %s (%s): patch of %d bytes for both slots" % (name, machine_id, size))
}
addtask lamadist_hosts after do_unpack do_prepare_recipe_sysroot before do_configure
do_lamadist_hosts[prefuncs] += "lamadist_require_signing_dir"
# The inventory's and the db key's contents, not their paths, make the task's signature.
def lamadist_hosts_inputs(d):
    import os
    keydir = d.getVar('LAMADIST_SIGNING_DIR')
    files = [d.getVar('LAMADIST_HOSTS')] + ([os.path.join(keydir, f) for f in ('db.key', 'db.crt')] if keydir else [])
    return ' '.join('%s:%s' % (f, os.path.exists(f)) for f in files if f)
do_lamadist_hosts[vardepsexclude] += "LAMADIST_HOSTS LAMADIST_SIGNING_DIR"
do_lamadist_hosts[file-checksums] += "${@lamadist_hosts_inputs(d)}"

# After meta-rauc's do_configure has filled BUNDLE_DIR: padding files and the mksquashfs sort file
# that put the images, in manifest order, on 4 KiB boundaries of the bundle.
python lamadist_bundle_align () {
    import configparser
    import os
    import lamadist.release
    bundle_dir = d.getVar('BUNDLE_DIR')
    manifest = configparser.ConfigParser(interpolation=None)
    manifest.read(os.path.join(bundle_dir, 'manifest.raucm'))
    images = [manifest[s]['filename'] for s in manifest.sections() if s.startswith('image.') and 'filename' in manifest[s]]
    for name, offset in lamadist.release.align_bundle(bundle_dir, images, d.getVar('LAMADIST_BUNDLE_SORT')):
        bb.note("%s at byte %d of the bundle" % (name, offset))
}
do_configure[postfuncs] += "lamadist_bundle_align"
