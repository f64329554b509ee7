# lamadist-image: the immutable, verified root of a LamaDist image.
#
# The root file system becomes an EROFS image; dm-verity's hash tree over it is written to a
# separate file (the verity_<slot> partition) with its root hash; then one UKI per slot is built
# whose command line carries roothash= and lamadist.slot=. The wic templates put EROFS and hash
# tree into slot A, and the ESP receives both UKIs plus systemd-boot as fallback loader.
#
# Outputs in DEPLOY_DIR_IMAGE, next to the usual image files:
#   <image>.erofs-lz4hc     EROFS root              <image>.verity     dm-verity hash tree
#   <image>.roothash        root hash (hex)         <image>.verity-params  veritysetup parameters
#   lamadist-a.efi / lamadist-b.efi                 UKIs of both slots, no host identity (signed when configured)
#   <image>.ukis.tar        the unsigned template UKIs of both slots, the RAUC efi slot image
# RAUC bundles (lamadist-bundle) take the EROFS image, the hash tree and the template UKIs from
# here, and add per host a patch that turns a template into the host's signed UKI.
#
# The EROFS root carries its SELinux labels and IMA signatures: it cannot be relabelled or signed
# on the device. mkfs.erofs labels every inode from the file_contexts of the policy installed in
# the rootfs, and before that meta-integrity's ima-evm-rootfs signs executables, shared objects
# and kernel modules with the fleet IMA key (LAMADIST_SIGNING_DIR/ima, IMA_KEYS_DIR), the same
# files and signature format as `lamadist image build --ima-key`.

inherit lamadist-uki

LAMADIST_EROFS_TYPE ?= "erofs-lz4hc"
# Reproducible EROFS: fixed timestamp and a UUID derived from image, machine and version.
LAMADIST_EROFS_UUID = "${@str(__import__('uuid').uuid5(__import__('uuid').NAMESPACE_URL, 'lamadist:erofs:%s:%s:%s' % (d.getVar('IMAGE_BASENAME'), d.getVar('MACHINE'), d.getVar('DISTRO_VERSION'))))}"
EXTRA_IMAGECMD:erofs-lz4hc = "-T ${REPRODUCIBLE_TIMESTAMP_ROOTFS} -U ${LAMADIST_EROFS_UUID} ${LAMADIST_EROFS_LABELS}"

# SELinux labels from the policy refpolicy-${POLICY_TYPE} installed (meta-selinux), when the
# distro has SELinux; erofs-utils-native gets libselinux from dynamic-layers/selinux.
LAMADIST_FILE_CONTEXTS = "${IMAGE_ROOTFS}${sysconfdir}/selinux/${POLICY_TYPE}/contexts/files/file_contexts"
LAMADIST_SELINUX_LABELS = "${@bb.utils.contains('DISTRO_FEATURES', 'selinux', '1', '', d) if bb.utils.contains('BBFILE_COLLECTIONS', 'selinux', True, False, d) else ''}"
LAMADIST_EROFS_LABELS = "${@'--file-contexts=' + d.getVar('LAMADIST_FILE_CONTEXTS') if d.getVar('LAMADIST_SELINUX_LABELS') else ''}"
do_image_erofs_lz4hc[prefuncs] += "lamadist_check_file_contexts"

python lamadist_check_file_contexts () {
    import os
    if not d.getVar('LAMADIST_SELINUX_LABELS'):
        return
    fc = d.getVar('LAMADIST_FILE_CONTEXTS')
    if not os.path.isfile(fc):
        bb.fatal("SELinux is a distro feature but the rootfs has no %s: the root image would be unlabelled (is refpolicy-%s installed?)" % (fc, d.getVar('POLICY_TYPE')))
}

# IMA signatures: executables, shared objects (named *.so or *.so.*: find cannot see the ELF magic
# the toolkit also looks at) and kernel modules, signed with evmctl (ima-evm-utils-native) at the
# end of do_rootfs. The class runs `find ${IMA_EVM_ROOTFS_SIGNED} -print0` in the rootfs: the
# value is shell words, hence the quoted parentheses and patterns.
LAMADIST_IMA_SIGN = "${@bb.utils.contains('DISTRO_FEATURES', 'ima', '1', '', d) if bb.utils.contains('BBFILE_COLLECTIONS', 'integrity-layer', True, False, d) else ''}"
inherit ${@'ima-evm-rootfs' if d.getVar('LAMADIST_IMA_SIGN') else ''}
IMA_EVM_ROOTFS_SIGNED = ". -path ./dev -prune -o -path ./proc -prune -o -path ./sys -prune -o -type f '(' -perm /111 -o -name '*.so' -o -name '*.so.*' -o -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.gz' -o -name '*.ko.zst' ')'"

# The certificate that verifies those signatures, where lamadist-init loads it into the kernel's
# IMA keyring from (the root's own copy, checked by dm-verity); lamadist-ima-policy's appraisal
# refuses everything unsigned once systemd has loaded it.
lamadist_ima_cert() {
    install -D -m 0644 ${IMA_KEYS_DIR}/x509_ima.der ${IMAGE_ROOTFS}${sysconfdir}/keys/x509_ima.der
}
ROOTFS_POSTPROCESS_COMMAND += "${@'lamadist_ima_cert' if d.getVar('LAMADIST_IMA_SIGN') else ''}"

# A salt per image and machine keeps hash trees of different products apart while staying
# reproducible (a random salt would change every build).
LAMADIST_VERITY_SALT = "${@__import__('hashlib').sha256(('lamadist:verity:%s:%s' % (d.getVar('IMAGE_BASENAME'), d.getVar('MACHINE'))).encode()).hexdigest()}"
LAMADIST_VERITY_UUID = "${@str(__import__('uuid').uuid5(__import__('uuid').NAMESPACE_URL, 'lamadist:verity:%s:%s:%s' % (d.getVar('IMAGE_BASENAME'), d.getVar('MACHINE'), d.getVar('DISTRO_VERSION'))))}"
# Size of the verity_<slot> partitions (layouts/*.yaml): the tree must fit.
LAMADIST_VERITY_PART_MIB ?= "64"

LAMADIST_EROFS_IMAGE = "${IMGDEPLOYDIR}/${IMAGE_NAME}.${LAMADIST_EROFS_TYPE}"
LAMADIST_VERITY_IMAGE = "${IMGDEPLOYDIR}/${IMAGE_NAME}.verity"

# The root image, its verity tree and UKIs, and the compressed A/B disk with its block map. Set
# here, not in the machine, so that other images (the initramfs, the installer) are unaffected;
# the upstream BSPs' own image types (ext4 root, tegraflash, plain wic) are not LamaDist's.
IMAGE_FSTYPES = "${LAMADIST_EROFS_TYPE} lamaverity wic.zst wic.bmap"
IMAGE_FEATURES += "read-only-rootfs"
IMAGE_TYPEDEP:lamaverity = "${LAMADIST_EROFS_TYPE}"
IMAGE_TYPEDEP:wic:append = " lamaverity"
IMAGE_TYPES:append = " lamaverity"

do_image_lamaverity[depends] += "cryptsetup-native:do_populate_sysroot ${LAMADIST_UKI_DEPENDS}"

IMAGE_CMD:lamaverity () {
    data=${LAMADIST_EROFS_IMAGE}
    hash=${LAMADIST_VERITY_IMAGE}
    rm -f "$hash" ${IMGDEPLOYDIR}/${IMAGE_NAME}.roothash
    veritysetup format \
        --hash=${LAMADIST_VERITY_HASH} \
        --data-block-size=${LAMADIST_VERITY_BLOCK_SIZE} \
        --hash-block-size=${LAMADIST_VERITY_BLOCK_SIZE} \
        --salt=${LAMADIST_VERITY_SALT} \
        --uuid=${LAMADIST_VERITY_UUID} \
        --root-hash-file=${IMGDEPLOYDIR}/${IMAGE_NAME}.roothash \
        "$data" "$hash" > ${IMGDEPLOYDIR}/${IMAGE_NAME}.verity-params
    limit=$(expr ${LAMADIST_VERITY_PART_MIB} \* 1048576)
    size=$(stat -c %s "$hash")
    if [ "$size" -gt "$limit" ]; then
        bbfatal "dm-verity hash tree is $size bytes, the verity partition holds $limit"
    fi
    # The wic rawcopy and the RAUC bundle take the tree from here; the root hash goes into the UKIs.
    ln -sf ${IMAGE_NAME}.verity ${IMGDEPLOYDIR}/${IMAGE_LINK_NAME}.verity
    ln -sf ${IMAGE_NAME}.roothash ${IMGDEPLOYDIR}/${IMAGE_LINK_NAME}.roothash
}
do_image_lamaverity[postfuncs] += "lamadist_image_ukis"

python lamadist_image_ukis () {
    import os
    import lamadist.release
    deploy = d.getVar('IMGDEPLOYDIR')
    with open(os.path.join(deploy, d.getVar('IMAGE_NAME') + '.roothash')) as f:
        roothash = f.read().strip()
    name = d.getVar('LAMADIST_UKI_NAME')
    templates = {}
    for slot in ('a', 'b'):
        template = os.path.join(d.getVar('T'), 'template-%s.efi' % slot)
        lamadist_build_uki(d, slot, roothash, template)
        with open(template, 'rb') as f:
            templates[slot] = f.read()
        out = os.path.join(deploy, '%s-%s.efi' % (name, slot))
        lamadist_sign_uki(d, template, out)
        bb.note("UKI for slot %s: %s" % (slot, out))
    # The RAUC efi slot image: the unsigned template UKIs under the names the bundle hook extracts,
    # each on a 16 KiB boundary (lamadist.release.efi_tar_members); lamadist-bundle adds each
    # host's patch to its own signed UKI.
    epoch = int(d.getVar('REPRODUCIBLE_TIMESTAMP_ROOTFS'))
    tarpath = os.path.join(deploy, d.getVar('IMAGE_NAME') + '.ukis.tar')
    lamadist.release.write_templates(tarpath, templates, epoch)
    link = os.path.join(deploy, d.getVar('IMAGE_LINK_NAME') + '.ukis.tar')
    if os.path.lexists(link):
        os.unlink(link)
    os.symlink(os.path.basename(tarpath), link)
}

# ESP contents for the wic templates: slot A's UKI where systemd-boot and the firmware's Boot####
# entry A look for it, systemd-boot as the removable-media fallback (it lists every Type #2 UKI in
# EFI/Linux), and on U-Boot machines the boot script. Slot B's UKI arrives with its first update;
# shipping it now would offer a boot entry for an empty slot.
IMAGE_BOOT_FILES = " \
    ${IMGDEPLOYDIR}/${LAMADIST_UKI_NAME}-a.efi;EFI/Linux/${LAMADIST_UKI_NAME}-a.efi \
    ${@'systemd-boot%s.efi;EFI/BOOT/%s' % (d.getVar('EFI_ARCH'), d.getVar('LAMADIST_EFI_BOOTNAME')) if d.getVar('LAMADIST_BOOT') == 'uki' else 'boot.scr'} \
"
LAMADIST_EFI_BOOTNAME ??= "BOOTX64.EFI"
do_image_wic[depends] += "${@'lamadist-boot-script:do_deploy' if d.getVar('LAMADIST_BOOT') == 'u-boot' else ''}"
WICVARS:append = " LAMADIST_EROFS_IMAGE LAMADIST_VERITY_IMAGE"
WKS_FILE_DEPENDS:append = " dosfstools-native mtools-native"
