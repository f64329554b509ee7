# meta-rockchip enables linux-yocto per machine name; the LamaDist Rockchip machines use the same
# kernel configuration as meta-rockchip's boards of their SoC (rockchip-kmeta, in-tree defconfig).
COMPATIBLE_MACHINE:lamadist-rk1 = "lamadist-rk1"
COMPATIBLE_MACHINE:lamadist-soquartz = "lamadist-soquartz"
