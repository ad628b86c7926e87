//! surgeon-search
