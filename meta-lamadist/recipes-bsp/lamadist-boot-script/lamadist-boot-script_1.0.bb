SUMMARY = "U-Boot boot script of LamaDist: RAUC A/B slot choice, then bootefi of the slot's UKI"
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://${COMMON_LICENSE_DIR}/Apache-2.0;md5=89aea4e17d99a7cacdbeed46a0096b10"

SRC_URI = "file://boot.cmd"
S = "${WORKDIR}"

DEPENDS = "u-boot-mkimage-native"
inherit deploy nopackages

# Only boards that boot through U-Boot use it (meta-lamadist-bsp sets LAMADIST_BOOT).
python () {
    if d.getVar('LAMADIST_BOOT') != 'u-boot':
        raise bb.parse.SkipRecipe("only for machines with LAMADIST_BOOT = \"u-boot\"")
}

do_compile() {
    uboot-mkimage -A ${UBOOT_ARCH} -O linux -T script -C none -n "LamaDist A/B" -d ${S}/boot.cmd ${B}/boot.scr
}

do_deploy() {
    install -m 0644 ${B}/boot.scr ${DEPLOYDIR}/boot.scr
}
addtask deploy after do_compile before do_build

PACKAGE_ARCH = "${MACHINE_ARCH}"
