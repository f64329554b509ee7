# mkfs.erofs labels the root image from the policy's file_contexts (lamadist-image.bbclass,
# --file-contexts); poky builds erofs-utils without libselinux, which that option needs.
PACKAGECONFIG[selinux] = "--with-selinux,--without-selinux,libselinux"
PACKAGECONFIG:append:class-native = " selinux"
