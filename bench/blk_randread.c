/* Random 4 KiB O_DIRECT reads from a block device, for bench_blk.py.
 *
 * Usage: blk_randread DEVICE COUNT
 * Prints "rand-read COUNT SECONDS". Built static so it runs in the busybox
 * initramfs. Offsets come from a fixed xorshift sequence, so pyvmm and QEMU
 * read the same blocks.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#define BLOCK 4096

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s DEVICE COUNT\n", argv[0]);
        return 2;
    }
    long count = atol(argv[2]);
    int fd = open(argv[1], O_RDONLY | O_DIRECT);
    if (fd < 0) {
        perror(argv[1]);
        return 1;
    }
    off_t blocks = lseek(fd, 0, SEEK_END) / BLOCK;
    void *buffer;
    if (blocks <= 0 || posix_memalign(&buffer, BLOCK, BLOCK) != 0) {
        fprintf(stderr, "%s: empty device or no memory\n", argv[1]);
        return 1;
    }
    uint64_t state = 0x9E3779B97F4A7C15ull;
    struct timespec start, end;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (long i = 0; i < count; i++) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        if (pread(fd, buffer, BLOCK, (off_t)(state % (uint64_t)blocks) * BLOCK) != BLOCK) {
            perror("pread");
            return 1;
        }
    }
    clock_gettime(CLOCK_MONOTONIC, &end);
    printf("rand-read %ld %.6f\n", count,
           (end.tv_sec - start.tv_sec) + (end.tv_nsec - start.tv_nsec) / 1e9);
    return 0;
}
