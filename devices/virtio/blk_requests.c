/* virtio-blk requests on a raw disk, compiled (built by blk_requests_build.py;
 * used by blk_requests.py, which explains when and why).
 *
 * blk_drain() takes the chains the driver made available on a queue, one by
 * one, and carries out those it can on its own: IN, OUT and FLUSH on a raw
 * file, through preadv/pwritev straight into and out of guest RAM. It stops
 * at the first chain it cannot carry out as planned - anything the guest got
 * wrong (a chain the walk refuses, a request out of range, on a read-only
 * disk, without a header or status byte), a request type it leaves to
 * Python, a host I/O error - *without taking it*: Python's queue.pop() and
 * VirtioBlock._handle() then take that chain and give it the outcome they
 * always give (an error status, or the queue's reset), and call blk_drain()
 * again for the rest. So this file refuses exactly what queue.py's walk
 * refuses, and otherwise carries a request out only when the Python path
 * would carry it out successfully; any other outcome is decided in Python.
 *
 * Everything the guest hands over is read once into a local before it is
 * checked (the guest may change it meanwhile, on another vCPU) and is
 * trusted for nothing: every buffer must lie in one region of guest RAM, a
 * chain may have no more descriptors than its table has entries (which is
 * also how a loop ends), indices stay inside their tables. */
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

/* What blk_drain() returns. */
#define BLK_DRAINED 0 /* no chain is available (any EVENT_IDX wish published) */
#define BLK_PYTHON 1  /* the next available chain is for Python */
#define BLK_FULL 2    /* the written-ranges report is full: report, and call again */

#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define DESC_F_INDIRECT 4

#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define S_OK 0

#define SECTOR_SIZE 512
#define HEADER_SIZE 16
/* The longest queue (and so chain) handled here: blk.QUEUE_SIZE. */
#define MAX_DESCRIPTORS 256
#define IOV_MAX_PER_CALL 1024    /* Linux's UIO_MAXIOV */

struct blk_region {
    uint64_t guest, size;
    uint8_t *host;
};

/* What stays the same from DRIVER_OK to the next reset. */
struct blk_device {
    const struct blk_region *regions;
    uint32_t region_count;
    int fd;
    uint8_t readonly;
    uint64_t capacity;     /* in sectors */
    uint64_t max_transfer; /* blk.MAX_TRANSFER: the longest read or write, in bytes */
};

/* One virtqueue as Python's Virtqueue holds it; the indices are written back. */
struct blk_queue {
    uint64_t desc, avail, used; /* guest addresses of the three areas */
    uint16_t size, last_avail, used_idx;
    uint8_t event_idx, indirect;
};

/* Where the ranges of guest RAM a request wrote go, for the software CPU's code invalidation
 * (nowhere when blk_drain is given NULL: nobody listens). With `wrote` set, to that function
 * at once (GuestMemory.native_write_listener): each range as [start, end) in the listener's
 * numbering of RAM, region i starting at starts[i]. Otherwise into pairs, as (guest address,
 * length), for Python to hand to GuestMemory.devices_wrote. */
struct blk_written {
    uint64_t *pairs;
    uint32_t capacity, count; /* in pairs */
    void (*wrote)(void *context, uint64_t start, uint64_t end);
    void *context;
    const uint64_t *starts; /* one per region */
};

struct descriptor {
    uint64_t addr;
    uint32_t len;
    uint16_t flags, next;
};

/* A walked chain: its buffers in host memory, readable ones first. */
struct chain {
    uint16_t head;
    uint32_t readable, writable; /* how many of each */
    uint64_t readable_length, writable_length;
    struct iovec buffers[MAX_DESCRIPTORS];
    uint64_t guest[MAX_DESCRIPTORS]; /* each buffer's guest address */
};

/* Host address of guest range address+length, NULL unless one region holds all of it
 * (GuestMemory.contains: a range of length 0 may sit at a region's end). */
static uint8_t *guest_ram(const struct blk_device *dev, uint64_t address, uint64_t length) {
    for (uint32_t i = 0; i < dev->region_count; i++) {
        const struct blk_region *r = &dev->regions[i];
        if (address >= r->guest && address - r->guest <= r->size && length <= r->size - (address - r->guest))
            return r->host + (address - r->guest);
    }
    return NULL;
}

static struct descriptor read_descriptor(const uint8_t *table, uint32_t index) {
    struct descriptor d;
    memcpy(&d, table + 16 * (size_t)index, sizeof d); /* little-endian, as on x86 */
    return d;
}

/* Queue._walk, refusing what it refuses (0: walked; -1: refused). The indirect table is
 * not copied first, as Python does, but each descriptor is still read only once. */
static int walk(const struct blk_device *dev, const struct blk_queue *q, const uint8_t *table,
                uint16_t head, struct chain *c) {
    c->head = head;
    c->readable = c->writable = 0;
    c->readable_length = c->writable_length = 0;
    if (head >= q->size)
        return -1;
    uint32_t limit = q->size, index = head, seen = 0;
    int indirect = 0;
    for (;;) {
        if (++seen > limit)
            return -1;
        struct descriptor d = read_descriptor(table, index);
        if (d.flags & DESC_F_INDIRECT) {
            /* Only a chain's sole descriptor may name a table, never from inside one. */
            if (!q->indirect || indirect || seen != 1 || d.flags & DESC_F_NEXT)
                return -1;
            if (d.len == 0 || d.len % 16 || d.len / 16 > q->size)
                return -1;
            if (!(table = guest_ram(dev, d.addr, d.len)))
                return -1;
            limit = d.len / 16, index = 0, seen = 0, indirect = 1;
            continue;
        }
        uint8_t *host = guest_ram(dev, d.addr, d.len);
        if (!host)
            return -1;
        if (!(d.flags & DESC_F_WRITE) && c->writable)
            return -1; /* a device-readable buffer after a device-writable one */
        uint32_t n = c->readable + c->writable; /* < limit <= MAX_DESCRIPTORS: seen counts them */
        c->buffers[n] = (struct iovec){host, d.len};
        c->guest[n] = d.addr;
        if (d.flags & DESC_F_WRITE)
            c->writable++, c->writable_length += d.len;
        else
            c->readable++, c->readable_length += d.len;
        if (!(d.flags & DESC_F_NEXT))
            return 0;
        index = d.next;
        if (index >= limit)
            return -1;
    }
}

/* The bytes [offset, offset+length) of the stream buffers[0..count) form, as iovecs in out
 * (DescriptorChain._pieces); the number of iovecs. The caller has checked the stream is long enough. */
static uint32_t cut(const struct iovec *buffers, const uint64_t *guest, uint32_t count, uint64_t offset,
                    uint64_t length, struct iovec *out, uint64_t *out_guest) {
    uint32_t n = 0;
    for (uint32_t i = 0; i < count && length; i++) {
        uint64_t size = buffers[i].iov_len;
        if (offset >= size) {
            offset -= size;
            continue;
        }
        uint64_t take = size - offset < length ? size - offset : length;
        out[n] = (struct iovec){(uint8_t *)buffers[i].iov_base + offset, take};
        out_guest[n++] = guest[i] + offset;
        length -= take, offset = 0;
    }
    return n;
}

/* preadv/pwritev the whole of iov[0..count) at offset; 0, or -1 on an error or end of file. */
static int transfer(int fd, int write, struct iovec *iov, uint32_t count, uint64_t offset) {
    while (count) {
        int chunk = count < IOV_MAX_PER_CALL ? (int)count : IOV_MAX_PER_CALL;
        ssize_t done = write ? pwritev(fd, iov, chunk, (off_t)offset) : preadv(fd, iov, chunk, (off_t)offset);
        if (done < 0 && errno == EINTR)
            continue;
        if (done <= 0)
            return -1; /* Python reads a shrunk file as zeros, and names errors */
        offset += (uint64_t)done;
        while (count && (uint64_t)done >= iov->iov_len)
            done -= (ssize_t)iov->iov_len, iov++, count--;
        if (count) {
            iov->iov_base = (uint8_t *)iov->iov_base + done;
            iov->iov_len -= (size_t)done;
        }
    }
    return 0;
}

/* Hands the listener [start, end) of a run of guest RAM in region `region`. */
static void tell(const struct blk_device *dev, const struct blk_written *written, uint32_t region,
                 uint64_t start, uint64_t end) {
    uint64_t base = written->starts[region] - dev->regions[region].guest;
    written->wrote(written->context, base + start, base + end);
}

/* Reports the buffers iov[0..count) at guest addresses guest[0..count), each inside one
 * region of guest RAM (walk() checked them). The listener gets runs of adjacent buffers
 * as one range (a 1 MiB read's 256 pages are often adjacent in twos and threes). */
static void report(const struct blk_device *dev, struct blk_written *written, const uint64_t *guest,
                   const struct iovec *iov, uint32_t count) {
    if (!written)
        return;
    if (!written->wrote) {
        for (uint32_t i = 0; i < count; i++) {
            written->pairs[2 * written->count] = guest[i];
            written->pairs[2 * written->count + 1] = iov[i].iov_len;
            written->count++;
        }
        return;
    }
    uint32_t region = 0;
    uint64_t start = 0, end = 0; /* the run so far, empty at first */
    for (uint32_t i = 0; i < count; i++) {
        uint64_t address = guest[i], length = iov[i].iov_len;
        if (length == 0)
            continue;
        if (start < end && address == end && address - dev->regions[region].guest < dev->regions[region].size) {
            end += length; /* (a buffer starting inside the run's region lies wholly in it) */
            continue;
        }
        if (start < end)
            tell(dev, written, region, start, end);
        for (region = 0; region < dev->region_count; region++)
            if (address - dev->regions[region].guest < dev->regions[region].size)
                break;
        start = end = 0;
        if (region < dev->region_count) /* (always) */
            start = address, end = address + length;
    }
    if (start < end)
        tell(dev, written, region, start, end);
}

/* Carry out a walked request as VirtioBlock._handle would when all goes well: the bytes
 * written into the chain, or -1 when Python is to handle it (nothing was written to guest
 * RAM then but data a failed read left, reported). */
static int64_t execute(const struct blk_device *dev, struct chain *c, struct blk_written *written) {
    struct iovec *writable = c->buffers + c->readable;
    uint64_t *writable_guest = c->guest + c->readable;
    uint32_t last = c->writable;
    while (last && writable[last - 1].iov_len == 0)
        last--;
    if (!last || c->readable_length < HEADER_SIZE)
        return -1; /* no room for a status byte (the queue breaks), or no header (IOERR) */
    uint8_t *status = (uint8_t *)writable[last - 1].iov_base + writable[last - 1].iov_len - 1;
    uint64_t status_guest = writable_guest[last - 1] + writable[last - 1].iov_len - 1;

    struct iovec header_iov[HEADER_SIZE];
    uint64_t header_guest[HEADER_SIZE];
    uint8_t header[HEADER_SIZE];
    uint32_t pieces = cut(c->buffers, c->guest, c->readable, 0, HEADER_SIZE, header_iov, header_guest);
    for (uint32_t i = 0, at = 0; i < pieces; at += header_iov[i].iov_len, i++)
        memcpy(header + at, header_iov[i].iov_base, header_iov[i].iov_len);
    uint32_t type;
    uint64_t sector;
    memcpy(&type, header, 4);
    memcpy(&sector, header + 8, 8);

    struct iovec data[MAX_DESCRIPTORS];
    uint64_t data_guest[MAX_DESCRIPTORS];
    int64_t data_written = 0;
    if (type == T_IN || type == T_OUT) {
        uint64_t length = type == T_IN ? c->writable_length - 1 : c->readable_length - HEADER_SIZE;
        if (type == T_OUT && dev->readonly)
            return -1;
        if (length % SECTOR_SIZE || length > dev->max_transfer || sector > dev->capacity ||
            length / SECTOR_SIZE > dev->capacity - sector)
            return -1;
        uint32_t count = type == T_IN
            ? cut(writable, writable_guest, c->writable, 0, length, data, data_guest)
            : cut(c->buffers, c->guest, c->readable, HEADER_SIZE, length, data, data_guest);
        if (type == T_IN)
            report(dev, written, data_guest, data, count); /* before the read: a failed one wrote some */
        if (transfer(dev->fd, type == T_OUT, data, count, sector * SECTOR_SIZE) < 0)
            return -1;
        data_written = type == T_IN ? (int64_t)length : 0;
    } else if (type == T_FLUSH) {
        if (!dev->readonly && fdatasync(dev->fd) < 0)
            return -1;
    } else {
        return -1; /* GET_ID, DISCARD, WRITE_ZEROES, unknown types: Python's */
    }
    *status = S_OK;
    struct iovec status_iov = {status, 1};
    report(dev, written, &status_guest, &status_iov, 1);
    return data_written + 1;
}

static uint16_t pending(const struct blk_queue *q, const uint8_t *avail) {
    /* Acquire: the ring entry and the descriptors are read after the index that published them. */
    return (uint16_t)(__atomic_load_n((const uint16_t *)(avail + 2), __ATOMIC_ACQUIRE) - q->last_avail);
}

static int blk_drain(const struct blk_device *dev, struct blk_queue *q, struct blk_written *written,
                     uint32_t *completed) {
    *completed = 0;
    const uint8_t *table = guest_ram(dev, q->desc, 16 * (uint64_t)q->size);
    const uint8_t *avail = guest_ram(dev, q->avail, 6 + 2 * (uint64_t)q->size);
    uint8_t *used = guest_ram(dev, q->used, 6 + 8 * (uint64_t)q->size);
    /* (Virtqueue.activate checked the areas; a queue this file was not written for is Python's.) */
    if (!table || !avail || !used || q->size > MAX_DESCRIPTORS)
        return BLK_PYTHON;
    struct chain chain; /* (about 6 KiB: on the stack, so each thread has its own) */
    for (;;) {
        uint16_t ready = pending(q, avail);
        if (ready == 0 && q->event_idx) {
            /* Ask to be kicked for the next entry, then look again: the driver may have
             * made it available before it could see the wish (Virtqueue.pop). */
            __atomic_store_n((uint16_t *)(used + 4 + 8 * q->size), q->last_avail, __ATOMIC_RELAXED);
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            ready = pending(q, avail);
        }
        if (ready == 0)
            return BLK_DRAINED;
        if (ready > q->size)
            return BLK_PYTHON; /* the driver's index ran ahead of the queue: Python breaks it */
        uint16_t head;
        memcpy(&head, avail + 4 + 2 * (q->last_avail % q->size), 2);
        if (walk(dev, q, table, head, &chain) < 0)
            return BLK_PYTHON;
        /* Room to report every writable buffer and the status byte, whatever the request. */
        if (written && written->count + chain.writable + 1 > written->capacity)
            return BLK_FULL;
        int64_t bytes = execute(dev, &chain, written);
        if (bytes < 0)
            return BLK_PYTHON;
        q->last_avail++;
        /* The element, then the index that publishes it (release: after the data and status). */
        uint8_t *element = used + 4 + 8 * (q->used_idx % q->size);
        uint32_t id = head, length = (uint32_t)bytes;
        memcpy(element, &id, 4);
        memcpy(element + 4, &length, 4);
        q->used_idx++;
        __atomic_store_n((uint16_t *)(used + 2), q->used_idx, __ATOMIC_RELEASE);
        (*completed)++;
    }
}
